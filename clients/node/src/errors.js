'use strict';
// gRPC status -> one error class per status a caller handles differently (the Python services' own names:
// services/common/errors.py). Every class extends RalmError, so `catch (e) { if (e instanceof RalmError) ... }`
// catches every failed call; `e.code` stays grpc-js's numeric status and `e.message` is the server's message.

const { status } = require('@grpc/grpc-js');

const CODE_NAMES = Object.fromEntries(Object.entries(status).map(([name, code]) => [code, name]));

class RalmError extends Error {
  /**
   * @param {string} message the server's message (grpc-js's `details`), written for a person
   * @param {{code?: number, metadata?: import('@grpc/grpc-js').Metadata, cause?: unknown}} [info]
   */
  constructor(message, { code = status.UNKNOWN, metadata, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.code = code;
    this.codeName = CODE_NAMES[code] ?? String(code);
    this.metadata = metadata; // the trailers of the failed call, when it reached a server
  }
}

class InvalidRequest extends RalmError {}    // INVALID_ARGUMENT: a field out of its range (gateway.proto's comments)
class NotFound extends RalmError {}          // NOT_FOUND
class Overloaded extends RalmError {}        // RESOURCE_EXHAUSTED: back-pressure; the message says when to retry
class Unavailable extends RalmError {}       // UNAVAILABLE: no server at the address, or a service is down
class DeadlineExceeded extends RalmError {}  // DEADLINE_EXCEEDED: the call's deadline or the request's deadline_s
class Cancelled extends RalmError {}         // CANCELLED: the caller cancelled (an AbortSignal, stream.cancel())
class Unauthenticated extends RalmError {}   // UNAUTHENTICATED: no bearer token, or not one the gateway accepts

const BY_CODE = {
  [status.INVALID_ARGUMENT]: InvalidRequest,
  [status.NOT_FOUND]: NotFound,
  [status.RESOURCE_EXHAUSTED]: Overloaded,
  [status.UNAVAILABLE]: Unavailable,
  [status.DEADLINE_EXCEEDED]: DeadlineExceeded,
  [status.CANCELLED]: Cancelled,
  [status.UNAUTHENTICATED]: Unauthenticated,
};

/** The RalmError for a grpc-js error (a ServiceError: code, details, metadata); other errors pass unchanged. */
function toRalmError(err) {
  if (err instanceof RalmError || typeof err?.code !== 'number' || typeof err?.details !== 'string') return err;
  const Kind = BY_CODE[err.code] ?? RalmError;
  return new Kind(err.details, { code: err.code, metadata: err.metadata, cause: err });
}

module.exports = {
  RalmError, InvalidRequest, NotFound, Overloaded, Unavailable, DeadlineExceeded, Cancelled, Unauthenticated,
  toRalmError,
};
