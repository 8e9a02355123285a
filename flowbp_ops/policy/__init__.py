"""The policy-gradient family beside reward backpropagation: Flow-GRPO and DiffusionNFT (issue 16)."""
