from .bridge import KalandraBridge

KalandraBridge().run()
