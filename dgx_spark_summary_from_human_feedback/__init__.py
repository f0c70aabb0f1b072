"""Learning to summarize from human feedback (SFT -> reward model -> PPO) on one DGX Spark."""

__version__ = "0.1.0"
