"""uniembed.data"""
