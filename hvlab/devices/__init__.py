"""hvlab.devices"""
