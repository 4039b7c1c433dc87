"""prof"""
