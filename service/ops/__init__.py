"""Pure ops over numpy arrays and Pillow images: decoding and resizing, boxes, masks,
region proposals. No gRPC, no Triton, no torch, no model spec."""
