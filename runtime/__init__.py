"""The process runtime every console script shares: settings declared once
(`settings`), the start-up skeleton and logging (`cli`), the event loop
(`eventloop`) and the allocator settings (`allocator`)."""
