'use strict';
// The gateway's contract, read at run time from protos/ralmspec/v1/*.proto (no generated copy to drift), and the
// standard grpc.health.v1 contract, which the repository does not hold (every service serves it).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PACKAGE = 'ralmspec.v1';
const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'protos');

// Messages as plain objects, with the .proto's field names (`max_new_tokens`: the names the server's
// INVALID_ARGUMENT messages use), enums as their names ('MODE_RALMSPEC'; numbers are accepted on input), int64 as
// numbers (passage ids are far below 2^53), empty repeated fields as [] and the oneof in use named
// (`chunk.chunk === 'delta'`).
const LOAD_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

/** grpc.health.v1 (https://github.com/grpc/grpc/blob/master/doc/health-checking.md) as a protobuf.js namespace. */
const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
    },
    Health: { methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } } },
  } } } } } } },
};

/**
 * The gateway's package definition and client constructors.
 * @param {string} [protoDir] the folder holding ralmspec/v1/*.proto (default: the repository's protos/)
 */
function loadContracts(protoDir = DEFAULT_PROTO_DIR) {
  const definition = protoLoader.loadSync([`${PACKAGE.replace('.', '/')}/gateway.proto`],
    { ...LOAD_OPTIONS, includeDirs: [protoDir] });
  const health = protoLoader.fromJSON(HEALTH_JSON, LOAD_OPTIONS);
  return {
    definition,
    GatewayClient: grpc.makeClientConstructor(definition[`${PACKAGE}.GatewayService`], 'GatewayService'),
    HealthClient: grpc.makeClientConstructor(health['grpc.health.v1.Health'], 'Health'),
  };
}

const JS_TYPES = {
  TYPE_STRING: 'string', TYPE_BOOL: 'boolean', TYPE_DOUBLE: 'number', TYPE_FLOAT: 'number', TYPE_INT32: 'number',
  TYPE_UINT32: 'number', TYPE_SINT32: 'number', TYPE_INT64: 'number', TYPE_UINT64: 'number', TYPE_SINT64: 'number',
};

/**
 * The path and complaint of the first field of `value` that protobuf.js would silently drop or coerce (a name the
 * message lacks, a string for a number, ...), or null. Ranges are the server's to check (INVALID_ARGUMENT).
 */
function shapeProblem(definition, typeName, value, where = '') {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return `${where || 'the request'} must be an object`;
  }
  const fields = new Map(definition[`${PACKAGE}.${typeName}`].type.field.map((f) => [f.name, f]));
  for (const [name, v] of Object.entries(value)) {
    const at = where ? `${where}.${name}` : name;
    const field = fields.get(name);
    if (!field) return `${at}: no such field in ${PACKAGE}.${typeName} (fields: ${[...fields.keys()].join(', ')})`;
    if (v === undefined || v === null) continue; // unset
    if (field.type === 'TYPE_MESSAGE') {
      const problem = shapeProblem(definition, field.typeName, v, at);
      if (problem) return problem;
    } else if (field.type === 'TYPE_ENUM') {
      const names = definition[`${PACKAGE}.${field.typeName}`].type.value.map((e) => e.name);
      if (typeof v === 'string' ? !names.includes(v) : !Number.isInteger(v)) {
        return `${at}: expected one of ${names.join(', ')} (or its number), got ${JSON.stringify(v)}`;
      }
    } else if (JS_TYPES[field.type] && typeof v !== JS_TYPES[field.type]) {
      return `${at}: expected a ${JS_TYPES[field.type]}, got ${typeof v}`;
    }
  }
  return null;
}

module.exports = { PACKAGE, DEFAULT_PROTO_DIR, loadContracts, shapeProblem };
