"""The transformer's math and its checkpoints: attention variants (GQA, MLA, sliding windows),
the MoE layer's routers and experts, quantized weights (FP8 blocks, MXFP4) and the reader of Hugging
Face checkpoints. No MPI: everything here runs in one process.
"""
