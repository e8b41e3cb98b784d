"""Ray actors, one per device_mapping entry, joined by a torch.distributed rendezvous."""
