"""The pipeline's stages, one module each; their order lives in `agentgw.pipeline`."""
