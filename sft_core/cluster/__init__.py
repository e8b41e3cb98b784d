"""The training cluster: one SFTWorker per device_mapping entry as a Ray actor, joined by a
torch.distributed rendezvous, driven in lockstep by Cluster."""
