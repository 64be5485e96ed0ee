"""The runtime: model forward passes, sampling, the generation loop and the tokenizer wrapper."""
