"""improv.trainer"""
