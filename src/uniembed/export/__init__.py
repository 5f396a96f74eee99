"""uniembed.export"""
