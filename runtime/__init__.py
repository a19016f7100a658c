"""What runs on one device inside one worker: device, model, layers, attention, KV storage."""
