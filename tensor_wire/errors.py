"""The one exception type of tensor_wire (torch-free, so every module can raise it)."""


class WireError(ValueError):
    """Bytes that are not a valid tensor_wire encoding, or a request the format cannot carry.

    Decoders raise only this for bad input from the network, whatever is wrong with it; it
    subclasses ValueError so that callers that already catch ValueError keep working.
    """
