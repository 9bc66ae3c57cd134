#!/usr/bin/env node
'use strict';
// Ask the gateway a question and print the answer as its tokens are verified:
//   node clients/node/examples/ask.js "Where did Super Bowl 50 take place?" --address 127.0.0.1:50051

const { parseArgs } = require('node:util');
const { GatewayClient, RalmError } = require('../src');

const MODES = { ralmspec: 'MODE_RALMSPEC', kv: 'MODE_BASELINE_KV', paper: 'MODE_BASELINE_PAPER' };
const USAGE = `usage: ask.js "question" [--address host:port] [--mode ralmspec|kv|paper] [--max-new-tokens n]
              [--draft rest|prompt|both] [--timeout-ms n] [--json]`;

async function main() {
  const { values: opt, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      address: { type: 'string', default: '127.0.0.1:50051' },
      mode: { type: 'string', default: 'ralmspec' },
      'max-new-tokens': { type: 'string' },
      draft: { type: 'string' },
      'timeout-ms': { type: 'string', default: '120000' },
      json: { type: 'boolean', default: false }, // print the whole reply as JSON instead of streaming
    },
  });
  if (positionals.length !== 1 || !MODES[opt.mode]) throw new Error(USAGE);
  const request = { question: positionals[0], mode: MODES[opt.mode] };
  if (opt['max-new-tokens']) request.max_new_tokens = Number(opt['max-new-tokens']);
  if (opt.draft) request.draft = `DRAFT_SOURCE_${opt.draft.toUpperCase()}`;

  const client = new GatewayClient(opt.address, { timeoutMs: Number(opt['timeout-ms']) });
  try {
    if (opt.json) {
      console.log(JSON.stringify(await client.generate(request), null, 2));
      return;
    }
    const stream = client.generateStream(request);
    for await (const delta of stream) process.stdout.write(delta.text);
    const { passages, stats } = stream.reply;
    console.log(`\n\npassages: ${passages.map((p) => `${p.title} (#${p.passage_id})`).join('; ') || 'none'}`);
    console.log(`${stream.reply.token_ids.length} tokens in ${stats.time.total_s.toFixed(2)} s `
      + `(retrieval ${stats.time.retrieval_s.toFixed(2)} s, LM ${stats.time.lm_s.toFixed(2)} s); `
      + `speculation accuracy ${stats.spec_accuracy.toFixed(2)}, ${stats.rollbacks} rollbacks`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err instanceof RalmError ? `${err.codeName}: ${err.message}` : err.message);
  process.exitCode = 1;
});
