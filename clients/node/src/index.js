'use strict';
// ralmspec's Node.js client: see ../README.md.

const { status, Metadata, credentials } = require('@grpc/grpc-js');
const { GatewayClient, TokenStream, GATEWAY_SERVICE } = require('./client');
const errors = require('./errors');
const { DEFAULT_PROTO_DIR } = require('./proto');

module.exports = {
  GatewayClient, TokenStream, GATEWAY_SERVICE, DEFAULT_PROTO_DIR, ...errors, status, Metadata, credentials,
};
