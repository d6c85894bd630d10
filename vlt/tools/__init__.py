"""The `vlt` tools that run trained stages over data: cache-latents, sample, export."""
