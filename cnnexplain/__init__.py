"""cnnexplain: train CNNs whose late-layer channels are disentangled by class, measure that
disentanglement, and explain any CNN with saliency maps, Network Dissection and TCAV."""

__version__ = "0.1.0"
