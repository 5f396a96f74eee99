"""uniembed.train"""
