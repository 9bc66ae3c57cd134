'use strict';
// `ralmspec up --profile tiny` for the end-to-end tests, run as a user runs it (tests/e2e/test_up.py does the
// same from Python): free ports, its own redis-server, the gateway address read from what it prints. Stopped with
// Ctrl-C's SIGINT (up drains and stops every child); killed if it lingers. Should this process die first, up gets
// SIGINT from the kernel (setpriv's parent-death signal) and its children follow it (they die with their parent).

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..', '..', '..');
const VENV = process.env.VENV ? path.resolve(ROOT, process.env.VENV) : path.join(ROOT, '.venv');
const PYTHON = path.join(VENV, 'bin', 'python');
const SETPRIV = '/usr/bin/setpriv';

/** Starts `ralmspec up`; resolves to {gateway, token, output(), stop()} once it prints "gateway ready on <address>"
 * (token: the API token it generated). */
function startUp({ profile = 'tiny', timeoutMs = 300_000 } = {}) {
  const cmd = [PYTHON, '-m', 'services.cli', 'up', '--profile', profile, '--port', '0'];
  const argv = fs.existsSync(SETPRIV) ? [SETPRIV, '--pdeathsig', 'INT', '--', ...cmd] : cmd;
  const env = { ...process.env, RALMSPEC_REDIS_URL: '' }; // empty: up starts its own redis-server
  const proc = spawn(argv[0], argv.slice(1), { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve(code ?? signal)));
  const killOnExit = () => proc.kill('SIGKILL');
  process.once('exit', killOnExit);

  async function stop(graceMs = 90_000) {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGINT');
      const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    }
    process.removeListener('exit', killOnExit);
    return exited;
  }

  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { stop(); reject(new Error(`up not ready after ${timeoutMs} ms:\n${out}`)); },
      timeoutMs);
    let ready = null; // set once: later output (up's shutdown lines) must not read the removed token file again
    const onData = (data) => {
      out += data;
      if (ready) return;
      ready = /gateway ready on (\S+)/.exec(out);
      if (ready) {
        clearTimeout(timer);
        // The API token `up` generated: the first line of the file it names (none when RALMSPEC_AUTH=off).
        const file = /^\s+api tokens file (\S+)/m.exec(out);
        const token = file ? fs.readFileSync(file[1], 'utf8').split('\n')[0].trim() : undefined;
        resolve({ gateway: ready[1], token, output: () => out, stop });
      }
    };
    proc.stdout.on('data', onData); // read to the end: a full pipe would block up's prints
    proc.stderr.on('data', onData);
    exited.then((code) => { clearTimeout(timer); reject(new Error(`up exited (${code}) before ready:\n${out}`)); });
  });
}

module.exports = { ROOT, PYTHON, startUp };
