"""uniembed.bench"""
