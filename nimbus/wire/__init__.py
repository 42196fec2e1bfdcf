"""Wire formats: the protobuf messages, result packs on the topics, traces, the messages the roles
exchange over the state store's channels (`pod_channel`), what a decode site does with bad input,
and every adaptation of grpclib's and trio-asyncio's internals (`grpc`)."""
