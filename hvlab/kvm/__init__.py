"""hvlab.kvm"""
