"""Pallas ragged paged attention kernels (TPU: Mosaic, GPU: Triton); see README.md."""
