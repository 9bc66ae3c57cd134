'use strict';
// The client against an in-process fake gateway (grpc-js server on the same contract): no ralmspec services.
// What only a fake can show: metadata and deadlines as the server receives them, and a cancelled stream.

const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { loadContracts } = require('../src/proto');
const {
  GatewayClient, RalmError, InvalidRequest, NotFound, DeadlineExceeded, Cancelled, Unavailable,
} = require('../src');

const seen = { calls: 0, metadata: null, deadline: null, streamCancelled: false };

function generate(call, done) {
  seen.calls += 1;
  seen.metadata = call.metadata.getMap();
  seen.deadline = call.getDeadline();
  const q = call.request.question;
  if (q === 'bad') {
    done({ code: grpc.status.INVALID_ARGUMENT, details: 'max_new_tokens must be in 1..1024, got 5000' });
  } else {
    setTimeout(() => done(null, { text: `echo ${q}`, token_ids: [7, 8], passages: [{ passage_id: 12, title: 't' }] }),
      q === 'slow' ? 300 : 0);
  }
}

function generateStream(call) {
  seen.calls += 1;
  if (call.request.question === 'endless') {
    const timer = setInterval(() => call.write({ delta: { token_ids: [1], text: 'a' } }), 10);
    call.on('cancelled', () => { seen.streamCancelled = true; clearInterval(timer); });
    return;
  }
  call.write({ delta: { token_ids: [1, 2], text: 'ab' } });
  call.write({ delta: { token_ids: [3], text: 'c' } });
  call.write({ done: { text: 'abcd', token_ids: [1, 2, 3, 4] } }); // 4 was never streamed
  call.end();
}

let server;
let address;

test.before(async () => {
  const { definition, HealthClient } = loadContracts();
  server = new grpc.Server();
  server.addService(definition['ralmspec.v1.GatewayService'], { Generate: generate, GenerateStream: generateStream });
  server.addService(HealthClient.service, {
    Check: (call, done) => (call.request.service === 'ralmspec.v1.GatewayService'
      ? done(null, { status: 'SERVING' })
      : done({ code: grpc.status.NOT_FOUND, details: 'unknown service' })),
  });
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0',
    grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  address = `127.0.0.1:${port}`;
});

test.after(() => server.forceShutdown());

test('generate passes metadata and the deadline through', async () => {
  const client = new GatewayClient(address);
  const t0 = Date.now();
  const reply = await client.generate({ question: 'hi' }, { metadata: { 'x-request-id': 'r-1' }, timeoutMs: 5000 });
  assert.equal(reply.text, 'echo hi');
  assert.deepEqual(reply.token_ids, [7, 8]);
  assert.equal(reply.passages[0].passage_id, 12); // int64 as a number
  assert.deepEqual(seen.metadata['x-request-id'], 'r-1');
  const deadline = seen.deadline instanceof Date ? seen.deadline.getTime() : seen.deadline;
  assert.ok(deadline > t0 && deadline <= t0 + 5000 + 50, `server saw deadline ${deadline}`);
  client.close();
});

test('a token goes out as `authorization: Bearer <token>` on every call; a call\'s own authorization wins', async () => {
  const client = new GatewayClient(address, { token: 'tok-abcdefghijklmnop' });
  await client.generate({ question: 'hi' });
  assert.equal(seen.metadata.authorization, 'Bearer tok-abcdefghijklmnop');
  await client.generate({ question: 'hi' }, { metadata: { authorization: 'Bearer other-token-0123456' } });
  assert.equal(seen.metadata.authorization, 'Bearer other-token-0123456');
  const plain = new GatewayClient(address);
  await plain.generate({ question: 'hi' });
  assert.equal(seen.metadata.authorization, undefined);
  client.close();
  plain.close();
});

test('generateStream yields every verified token, the ones only in the final reply included', async () => {
  const client = new GatewayClient(address);
  const stream = client.generateStream({ question: 'hi' });
  const deltas = [];
  for await (const d of stream) deltas.push(d);
  assert.deepEqual(deltas, [{ token_ids: [1, 2], text: 'ab' }, { token_ids: [3], text: 'c' },
    { token_ids: [4], text: 'd' }]);
  assert.equal(stream.reply.text, 'abcd');
  client.close();
});

test('leaving the loop early cancels the stream on the server', async () => {
  const client = new GatewayClient(address);
  let n = 0;
  for await (const d of client.generateStream({ question: 'endless' })) {
    n += d.token_ids.length;
    if (n >= 3) break;
  }
  for (let i = 0; i < 50 && !seen.streamCancelled; i += 1) await new Promise((r) => setTimeout(r, 10));
  assert.ok(seen.streamCancelled);
  client.close();
});

test('status codes map to error classes carrying the server message', async () => {
  const client = new GatewayClient(address);
  await assert.rejects(client.generate({ question: 'bad' }), (err) => {
    assert.ok(err instanceof InvalidRequest && err instanceof RalmError && err instanceof Error);
    assert.equal(err.message, 'max_new_tokens must be in 1..1024, got 5000');
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    return true;
  });
  await assert.rejects(client.generate({ question: 'slow' }, { timeoutMs: 20 }), DeadlineExceeded);
  const stream = client.generateStream({ question: 'endless' }, { deadline: new Date(Date.now() + 30) });
  await assert.rejects(async () => { for await (const _ of stream) { /* drain */ } }, DeadlineExceeded);
  const abort = new AbortController();
  const pending = client.generate({ question: 'slow' }, { signal: abort.signal });
  abort.abort();
  await assert.rejects(pending, Cancelled);
  client.close();
});

test('a field protobuf.js would drop or coerce is refused before sending', async () => {
  const client = new GatewayClient(address);
  const before = seen.calls;
  await assert.rejects(client.generate({ question: 'hi', max_tokens: 3 }), /max_tokens: no such field/);
  await assert.rejects(client.generate({ question: 'hi', knn: { k: '8' } }), /knn\.k: expected a number/);
  await assert.rejects(client.generate({ question: 'hi', mode: 'RALMSPEC' }), InvalidRequest);
  assert.throws(() => client.generateStream({ prompt: 'x', draft: 'REST' }), /draft: expected one of/);
  assert.equal(seen.calls, before);
  client.close();
});

test('health check, and no server at the address', async () => {
  const client = new GatewayClient(address);
  assert.equal(await client.checkHealth(), 'SERVING');
  await assert.rejects(client.checkHealth('nope'), NotFound);
  client.close();
  const nobody = new GatewayClient('127.0.0.1:1', { timeoutMs: 2000 });
  await assert.rejects(nobody.generate({ question: 'hi' }), Unavailable);
  await assert.rejects(nobody.waitForReady(200), Unavailable);
  nobody.close();
});
