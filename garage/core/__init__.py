"""The seed library's core surface (`model_garage.core` → `garage.core`)."""
