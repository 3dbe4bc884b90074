"""hvlab.vmbus"""
