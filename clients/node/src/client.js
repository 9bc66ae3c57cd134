'use strict';
// GatewayClient: ralmspec.v1.GatewayService (Generate, GenerateStream) and grpc.health.v1 over one channel.
// Every failure rejects with a RalmError subclass (errors.js); requests are plain objects with gateway.proto's
// field names, checked for shape before sending (protobuf.js would drop an unknown name without a word).

const grpc = require('@grpc/grpc-js');
const { loadContracts, shapeProblem } = require('./proto');
const { InvalidRequest, Unavailable, toRalmError } = require('./errors');

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024; // as the services (services/common/grpc_server.py)
const GATEWAY_SERVICE = 'ralmspec.v1.GatewayService';

/**
 * Per-call options.
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] the call's deadline, from now (the client's default when unset)
 * @property {Date|number} [deadline] an absolute deadline (Date, or ms since the epoch); the earlier one wins
 * @property {grpc.Metadata|Record<string, string|Buffer|Array<string|Buffer>>} [metadata] sent with the call
 * @property {AbortSignal} [signal] aborting cancels the call (the gateway then stops the request's LM work)
 */

/** grpc.Metadata from a plain object (keys ending in -bin carry Buffers) or as given (copied), with `authorization:
 * Bearer <token>` added when a token is given and the caller sent none of its own. */
function toMetadata(metadata, token) {
  let md;
  if (metadata instanceof grpc.Metadata) {
    md = metadata.clone();
  } else {
    md = new grpc.Metadata();
    for (const [key, value] of Object.entries(metadata ?? {})) {
      for (const v of Array.isArray(value) ? value : [value]) md.add(key, v);
    }
  }
  if (token && md.get('authorization').length === 0) md.set('authorization', `Bearer ${token}`);
  return md;
}

/** Channel credentials: TLS from PEM buffers ({ca, cert, key}; cert and key for mutual TLS), else plaintext. */
function channelCredentials({ credentials, tls }) {
  if (credentials) return credentials;
  if (!tls) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null);
}

class GatewayClient {
  /**
   * @param {string} [address] the gateway, host:port (`ralmspec up` prints it)
   * @param {object} [options]
   * @param {string} [options.token] the bearer token every call sends (the gateway's RALMSPEC_API_TOKENS_FILE holds
   *   the accepted ones; `ralmspec up` prints where); a call's own `authorization` metadata wins
   * @param {{ca?: Buffer, cert?: Buffer, key?: Buffer}} [options.tls] TLS: the CA that signed the gateway's certificate
   *   (default: the system's roots), and this client's certificate and key for a gateway that requires mutual TLS
   * @param {grpc.ChannelCredentials} [options.credentials] channel credentials as built (overrides `tls`); default:
   *   plaintext, as `ralmspec up` serves
   * @param {number} [options.timeoutMs] default deadline of every call (unset: none)
   * @param {string} [options.protoDir] the folder holding ralmspec/v1/*.proto (default: this repository's)
   * @param {grpc.ChannelOptions} [options.channelOptions] extra channel arguments
   */
  constructor(address = '127.0.0.1:50051', options = {}) {
    const { definition, GatewayClient: Gateway, HealthClient } = loadContracts(options.protoDir);
    this.definition = definition;
    this.timeoutMs = options.timeoutMs;
    this.token = options.token;
    const channelOptions = {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      ...options.channelOptions,
    };
    const credentials = channelCredentials(options);
    this.stub = new Gateway(address, credentials, channelOptions);
    this.health = new HealthClient(address, credentials, { channelOverride: this.stub.getChannel() });
  }

  /**
   * The whole answer: a GenerateReply ({text, token_ids, passages, stats, gaps, request_id}). `request_id` is the
   * `x-request-id` metadata sent (`options.metadata`), else the gateway's own: every service logs the request under it.
   * @param {object} request a GenerateRequest, e.g. {question: 'Who wrote Hamlet?', mode: 'MODE_RALMSPEC'}
   * @param {CallOptions} [options]
   */
  generate(request, options = {}) {
    return new Promise((resolve, reject) => {
      this.check(request);
      const call = this.stub.Generate(request, toMetadata(options.metadata, this.token), this.callOptions(options),
        (err, reply) => (err ? reject(toRalmError(err)) : resolve(reply)));
      abortWith(options.signal, call);
    });
  }

  /**
   * Verified tokens as they come: `for await (const {token_ids, text} of client.generateStream(req))`; after the
   * loop, `stream.reply` holds the GenerateReply. Leaving the loop early cancels the call.
   * @param {object} request a GenerateRequest
   * @param {CallOptions} [options]
   * @returns {TokenStream}
   */
  generateStream(request, options = {}) {
    this.check(request);
    const call = this.stub.GenerateStream(request, toMetadata(options.metadata, this.token),
      this.callOptions(options));
    abortWith(options.signal, call);
    return new TokenStream(call);
  }

  /**
   * The serving status of `service` ('SERVING', 'NOT_SERVING', ...; '' = the whole server) by grpc.health.v1.
   * @param {string} [service]
   * @param {CallOptions} [options]
   */
  checkHealth(service = GATEWAY_SERVICE, options = {}) {
    return new Promise((resolve, reject) => {
      this.health.Check({ service }, toMetadata(options.metadata), this.callOptions(options),
        (err, reply) => (err ? reject(toRalmError(err)) : resolve(reply.status)));
    });
  }

  /** Resolves once the channel is connected; rejects with Unavailable after `timeoutMs`. */
  waitForReady(timeoutMs = 10_000) {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(Date.now() + timeoutMs, (err) => (err
        ? reject(new Unavailable(`no gateway at ${this.stub.getChannel().getTarget()} after ${timeoutMs} ms: ${err.message}`,
          { code: grpc.status.UNAVAILABLE, cause: err }))
        : resolve()));
    });
  }

  close() {
    this.stub.close();
  }

  /** InvalidRequest (thrown here, nothing sent) when `request` has a field protobuf.js would drop or coerce. */
  check(request) {
    const problem = shapeProblem(this.definition, 'GenerateRequest', request);
    if (problem) throw new InvalidRequest(problem, { code: grpc.status.INVALID_ARGUMENT });
  }

  callOptions({ timeoutMs = this.timeoutMs, deadline }) {
    const ends = [];
    if (timeoutMs !== undefined) ends.push(Date.now() + timeoutMs);
    if (deadline !== undefined) ends.push(deadline instanceof Date ? deadline.getTime() : deadline);
    return ends.length ? { deadline: Math.min(...ends) } : {};
  }
}

function abortWith(signal, call) {
  if (!signal) return;
  if (signal.aborted) call.cancel();
  else signal.addEventListener('abort', () => call.cancel(), { once: true });
}

/** GenerateStream's verified tokens: an async iterable of {token_ids, text}, then `reply` (the GenerateReply). */
class TokenStream {
  constructor(call) {
    this.call = call;
    this.reply = null;
  }

  cancel() {
    this.call.cancel();
  }

  async *[Symbol.asyncIterator]() {
    let streamed = 0; // tokens yielded so far
    let text = '';
    let ended = false;
    try {
      for await (const chunk of this.call) {
        if (chunk.chunk === 'delta') {
          streamed += chunk.delta.token_ids.length;
          text += chunk.delta.text;
          yield { token_ids: chunk.delta.token_ids, text: chunk.delta.text };
        } else if (chunk.chunk === 'done') { // the last message: the whole reply, with any tokens not yet streamed
          this.reply = chunk.done;
          const rest = chunk.done.token_ids.slice(streamed);
          if (rest.length) {
            yield { token_ids: rest, text: chunk.done.text.startsWith(text) ? chunk.done.text.slice(text.length) : '' };
          }
        }
      }
      ended = true;
    } catch (err) {
      ended = true;
      throw toRalmError(err);
    } finally {
      if (!ended) { // the caller left the loop: stop the request (a late CANCELLED status has no one to read it)
        this.call.on('error', () => {});
        this.call.cancel();
      }
    }
  }
}

module.exports = { GatewayClient, TokenStream, GATEWAY_SERVICE };
