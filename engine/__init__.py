"""improv.engine"""
