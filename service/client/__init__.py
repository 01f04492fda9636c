"""The user's side: `convserve predict` (a gRPC client of the gateway that prints
results) and drawing results onto images. It imports no torch and no gateway code."""
