"""(being written)"""
CHECKS: list = []
