"""uniembed.serve"""
