"""Protobuf codecs: the context, its deltas and decisions on the wire (proto/*.proto)."""
