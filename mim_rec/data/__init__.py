"""Data contracts (Arrow schemas, validating readers/writers, manifests), the synthetic
default world, importers of public formats and the KeyedJaggedTensor loader."""
