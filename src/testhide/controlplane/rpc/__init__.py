"""The gRPC edge: servicers decode, call the domain, encode. Only this package
imports generated protobuf code."""
