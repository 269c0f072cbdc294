"""(being written)"""
ASSETS: list = []
