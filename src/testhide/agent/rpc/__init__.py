"""The agent's side of the contract: enrollment and the Connect stream. Only
this package imports generated protobuf code."""
