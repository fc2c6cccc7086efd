"""Wire in: the only code that knows a wire protocol. Each adapter turns messages into `Call`s."""
