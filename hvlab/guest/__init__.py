"""hvlab.guest"""
