"""improv.server"""
