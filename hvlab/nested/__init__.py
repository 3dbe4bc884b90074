"""hvlab.nested"""
