"""hvlab.protocol"""
