"""improv.clients"""
