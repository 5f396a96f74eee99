"""uniembed_lab.bench"""
