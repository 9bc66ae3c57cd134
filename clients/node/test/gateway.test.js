'use strict';
// End to end: `ralmspec up --profile tiny`, then the same requests through the Python client (reference.py) and
// this one: Generate and GenerateStream give the Python client's tokens; deadlines and bad fields give the
// server's statuses and messages.

const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { ROOT, PYTHON, startUp } = require('./cluster');
const { GatewayClient, InvalidRequest, DeadlineExceeded, Unauthenticated } = require('../src');

const Q1 = 'Which NFL team represented the AFC at Super Bowl 50?'; // tiny's questions are SQuAD dev's
const Q2 = 'Where did Super Bowl 50 take place?';
// One request per way of using the gateway: iterative RaLM QA with RaLMSpec (+PSA switches), KNN-LM speculated
// from its cache, REST drafting (corpus datastore + prompt lookup) inside the KV baseline's strides.
const SAME_TOKENS = {
  'RaLM QA, RaLMSpec +PSA': {
    question: Q1, mode: 'MODE_RALMSPEC', max_new_tokens: 12,
    speculation: { stride: 3, prefetch: true, os3: true, asynchronous: true },
  },
  'KNN-LM, RaLMSpec': { prompt: `${Q2} Background:\n`, mode: 'MODE_RALMSPEC', max_new_tokens: 10, knn: { k: 64 } },
  'REST drafting, baseline-kv': {
    question: Q2, mode: 'MODE_BASELINE_KV', draft: 'DRAFT_SOURCE_BOTH', max_new_tokens: 16,
    retriever: 'RETRIEVER_KIND_EXACT',
  },
};
const INVALID = {
  'max_new_tokens out of range': { question: Q1, max_new_tokens: 5000 },
  'knn.k out of range': { prompt: 'The Super Bowl is', knn: { k: 0 } },
  'neither prompt nor question': { mode: 'MODE_RALMSPEC' },
  'an unknown draft source': { question: Q1, draft: 9 },
};

let cluster;
let client;
let python; // the Python client's answer to each request, by name

test.before(async () => {
  cluster = await startUp();
  client = new GatewayClient(cluster.gateway, { timeoutMs: 120_000, token: cluster.token });
  const names = [...Object.keys(SAME_TOKENS), ...Object.keys(INVALID)];
  const answers = JSON.parse(execFileSync(PYTHON, [path.join(__dirname, 'reference.py'), cluster.gateway], {
    cwd: ROOT, env: { ...process.env, RALMSPEC_API_TOKEN: cluster.token ?? '' }, input: JSON.stringify(names.map((n) => SAME_TOKENS[n] ?? INVALID[n])), timeout: 300_000,
  }));
  python = Object.fromEntries(names.map((n, i) => [n, answers[i]]));
}, { timeout: 600_000 });

test.after(async () => {
  client?.close();
  const code = await cluster?.stop();
  assert.equal(code, 0, `ralmspec up exited with ${code}:\n${cluster?.output()}`);
});

test('the gateway is healthy', async () => {
  assert.equal(await client.checkHealth(), 'SERVING');
  assert.equal(await client.checkHealth(''), 'SERVING');
});

for (const [name, request] of Object.entries(SAME_TOKENS)) {
  test(`Generate and GenerateStream give the Python client's tokens: ${name}`, async () => {
    const want = python[name];
    assert.ok(want.token_ids?.length, `Python got no tokens: ${JSON.stringify(want)}`);
    const reply = await client.generate(request, { metadata: { 'x-request-id': `node-${name}` } });
    assert.deepEqual(reply.token_ids, want.token_ids);
    assert.equal(reply.text, want.text);
    assert.equal(reply.request_id, `node-${name}`); // the id the services logged this request under

    const stream = client.generateStream(request);
    const tokens = [];
    for await (const delta of stream) tokens.push(...delta.token_ids);
    assert.deepEqual(tokens, want.token_ids);
    assert.deepEqual(stream.reply.token_ids, want.token_ids);
    assert.equal(stream.reply.text, want.text); // a question's answer: the first line of the streamed text, trimmed
    assert.match(stream.reply.request_id, /^[0-9a-f]{32}$/); // none sent: the gateway's own
  });
}

test('a deadline of a few ms gives DEADLINE_EXCEEDED (gRPC deadline, and the request\'s deadline_s)', async () => {
  const request = SAME_TOKENS['RaLM QA, RaLMSpec +PSA'];
  await assert.rejects(client.generate(request, { timeoutMs: 5 }), DeadlineExceeded);
  const stream = client.generateStream(request, { timeoutMs: 5 });
  await assert.rejects(async () => { for await (const _ of stream) { /* drain */ } }, DeadlineExceeded);
  // deadline_s is the gateway's: checked between retrieval strides, so this request has several (a QA answer that
  // ends within its first stride is not stopped by it, as of this writing)
  const long = { prompt: 'The Super Bowl is', mode: 'MODE_BASELINE_KV', max_new_tokens: 24, deadline_s: 0.005 };
  await assert.rejects(client.generate(long), (err) => {
    assert.ok(err instanceof DeadlineExceeded, `${err.name}: ${err.message}`);
    assert.match(err.message, /ran past its 0\.005 s deadline/); // the server's message
    return true;
  });
});

for (const [name, request] of Object.entries(INVALID)) {
  test(`INVALID_ARGUMENT with the server's message: ${name}`, async () => {
    const want = python[name];
    assert.equal(want.code, 'INVALID_ARGUMENT');
    await assert.rejects(client.generate(request), (err) => {
      assert.ok(err instanceof InvalidRequest, `${err.name}: ${err.message}`);
      assert.equal(err.message, want.details);
      return true;
    });
    await assert.rejects(async () => { for await (const _ of client.generateStream(request)) { /* drain */ } },
      (err) => err instanceof InvalidRequest && err.message === want.details);
  });
}

test('without a token, or with a wrong one, the gateway answers UNAUTHENTICATED and says no more', async () => {
  assert.ok(cluster.token, 'ralmspec up printed no API token file');
  for (const options of [{}, { token: 'not-the-token-0123456789' }]) {
    const stranger = new GatewayClient(cluster.gateway, { timeoutMs: 30_000, ...options });
    await assert.rejects(stranger.generate({ question: Q1 }), (err) => {
      assert.ok(err instanceof Unauthenticated, `${err.name}: ${err.message}`);
      assert.equal(err.message, 'missing or invalid bearer token');
      return true;
    });
    assert.equal(await stranger.checkHealth(), 'SERVING'); // health stays open (probes)
    stranger.close();
  }
});
