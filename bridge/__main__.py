from .app import KalandraBridge

KalandraBridge().run()
