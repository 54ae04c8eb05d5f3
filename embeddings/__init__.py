"""The representation center: the MM embedding table (MFM), its sharded frozen loading into
TorchRec, and real-time inference of new items (RIM)."""
