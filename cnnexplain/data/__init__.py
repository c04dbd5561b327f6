"""Datasets: the synthetic world, Broden, torchvision datasets and image folders."""
