"""Native (C++) CPU kernels, called from jitted code through XLA's FFI."""
