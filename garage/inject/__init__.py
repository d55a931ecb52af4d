"""The seed library's injection surface (`model_garage.inject` → `garage.inject`), on the hook backend."""
