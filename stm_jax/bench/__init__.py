"""Step time, memory and arithmetic floor of each barrier mode; nanoGPT's step as a peer."""
